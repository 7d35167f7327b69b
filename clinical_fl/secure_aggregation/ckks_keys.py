"""Make the CKKS key material for encrypted aggregation (operators: deploy/ckks-keys.sh).

    python -m clinical_fl.secure_aggregation.ckks_keys OUT_DIR [--poly-modulus-degree 8192]
        [--scale-bits 40]
        [--coeff-mod-bit-sizes 60,40,40,60]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from clinical_fl.secure_aggregation.ckks import (
    CkksParameters,
    KeyMaterialError,
    describe,
    fingerprint,
    generate_key_material,
    load_public_context,
)


def main(argv: list[str] | None = None) -> int:
    """Write OUT_DIR/ckks-secret.ctx and OUT_DIR/ckks-public.ctx; 1 if that was refused."""
    defaults = CkksParameters()
    parser = argparse.ArgumentParser(
        prog="python -m clinical_fl.secure_aggregation.ckks_keys",
        description="Make the CKKS key material shared by the hospitals (secret context) and "
                    "the coordinator (public context). Never overwrites existing files.")
    parser.add_argument("out_dir", type=Path, metavar="OUT_DIR")
    parser.add_argument("--poly-modulus-degree", type=int, default=defaults.poly_modulus_degree,
                        help="N: each ciphertext holds N/2 values (default %(default)s)")
    parser.add_argument("--scale-bits", type=int, default=defaults.global_scale_bits,
                        help="CKKS scale 2^BITS (default %(default)s)")
    parser.add_argument("--coeff-mod-bit-sizes", type=_bit_sizes,
                        default=defaults.coeff_mod_bit_sizes,
                        help="coefficient moduli, comma-separated bit sizes (default "
                             f"{','.join(map(str, defaults.coeff_mod_bit_sizes))})")
    args = parser.parse_args(argv)
    params = CkksParameters(poly_modulus_degree=args.poly_modulus_degree,
                            coeff_mod_bit_sizes=args.coeff_mod_bit_sizes,
                            global_scale_bits=args.scale_bits)
    try:
        secret_path, public_path = generate_key_material(args.out_dir, params)
    except KeyMaterialError as err:
        print(f"ckks_keys: {err}", file=sys.stderr)
        return 1
    public = public_path.read_bytes()
    print(f"key fingerprint {fingerprint(public)}: "
          f"{describe(load_public_context(public, 'ckks_keys'))}")
    print(f"{secret_path} (secret, mode 0600): copy to EVERY hospital and name it in its "
          f"SuperNode node config as ckks-context=<path>. It must never reach the coordinator.")
    print(f"{public_path} (public): give to the coordinator "
          "(secure_aggregation.ckks_public_context=<path>).")
    print("Once every hospital has the secret context, delete this copy of it: whoever keeps "
          "it can read every hospital's update the server receives.")
    return 0


def _bit_sizes(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected bit sizes like 60,40,40,60, got {text!r}") \
            from err


if __name__ == "__main__":
    sys.exit(main())
