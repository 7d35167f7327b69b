"""TF-IDF + logistic regression on the synthetic notes: how hard is the data set?

    clinical-fl-baseline --hospitals 4 --notes-per-hospital 300
    clinical-fl-baseline --note-length long      # data=synthetic_long's notes, read whole

Trains on the federation's pooled training splits (what a centralized model
could see) and scores the same held-out splits the hospitals use.
"""

from __future__ import annotations

import argparse

from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score

from settings.task import DataSettings, NoteLength
from tasks.data.hospital_data import load_hospital_data, load_server_test_set, source_labels


def tfidf_baseline(settings: DataSettings, num_hospitals: int) -> dict[str, float]:
    labels = source_labels(settings)
    train_texts, train_y, eval_texts, eval_y = [], [], [], []
    for hospital in range(num_hospitals):
        data = load_hospital_data(settings, labels, hospital, num_hospitals)
        train_texts += data.train["text"]
        train_y += data.train["label"]
        eval_texts += data.eval["text"]
        eval_y += data.eval["label"]
    vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=2)
    classifier = LogisticRegression(max_iter=2000, C=10.0)
    classifier.fit(vectorizer.fit_transform(train_texts), train_y)
    predicted = classifier.predict(vectorizer.transform(eval_texts))
    scores = {"hospital_eval_accuracy": accuracy_score(eval_y, predicted),
              "hospital_eval_macro_f1": f1_score(eval_y, predicted, average="macro")}
    test = load_server_test_set(settings, labels)
    if test is not None:
        predicted = classifier.predict(vectorizer.transform(test["text"]))
        scores["central_accuracy"] = accuracy_score(test["label"], predicted)
        scores["central_macro_f1"] = f1_score(test["label"], predicted, average="macro")
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hospitals", type=int, default=2)
    parser.add_argument("--notes-per-hospital", type=int, default=300)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--note-length", choices=[n.value for n in NoteLength],
                        default=NoteLength.short.value)
    args = parser.parse_args()
    settings = DataSettings(notes_per_hospital=args.notes_per_hospital, seed=args.seed,
                            note_length=NoteLength(args.note_length))
    for key, value in tfidf_baseline(settings, args.hospitals).items():
        print(f"{key}\t{value:.4f}")


if __name__ == "__main__":
    main()
