"""The clinical vocabulary of the synthetic notes, shared by the short and the long notes.

Both kinds of notes (synthetic_notes.py, synthetic_long_notes.py) draw their cases from these
words, so a long note and a short note of one specialty speak of the same cases.  The words
overlap across specialties on purpose (see ``LOOKALIKES``): the notes are not meant to be
trivially separable.
"""

from __future__ import annotations

SPECIALTIES: tuple[str, ...] = (
    "cardiology",
    "pulmonology",
    "gastroenterology",
    "neurology",
    "endocrinology",
    "orthopedics",
)

# Which specialties present alike: a case of the key specialty is sometimes
# written up with the complaints and symptoms of one of these.
LOOKALIKES: dict[str, tuple[str, ...]] = {
    "cardiology": ("pulmonology", "gastroenterology", "endocrinology"),
    "pulmonology": ("cardiology", "gastroenterology"),
    "gastroenterology": ("cardiology", "endocrinology"),
    "neurology": ("cardiology", "orthopedics", "endocrinology"),
    "endocrinology": ("neurology", "cardiology", "gastroenterology"),
    "orthopedics": ("neurology", "endocrinology"),
}

COMPLAINTS: dict[str, tuple[str, ...]] = {
    "cardiology": ("chest pain", "palpitations", "shortness of breath on exertion",
                   "leg swelling", "near fainting", "chest tightness"),
    "pulmonology": ("cough", "shortness of breath", "wheezing", "chest tightness",
                    "coughing up blood", "chest pain when breathing"),
    "gastroenterology": ("abdominal pain", "heartburn", "chest pain after meals",
                         "blood in stool", "nausea and vomiting", "difficulty swallowing"),
    "neurology": ("headache", "dizziness", "numbness in the hands", "episodes of confusion",
                  "weakness on one side", "near fainting"),
    "endocrinology": ("fatigue", "weight loss", "excessive thirst", "palpitations",
                      "tingling in the feet", "heat intolerance"),
    "orthopedics": ("low back pain", "knee pain", "shoulder pain", "numbness in the hands",
                    "hip pain", "ankle swelling after a fall"),
}

SYMPTOMS: dict[str, tuple[str, ...]] = {
    "cardiology": ("pressure-like discomfort radiating to the left arm",
                   "symptoms worse with stairs and relieved by rest",
                   "orthopnea requiring two pillows", "intermittent racing heartbeat",
                   "bilateral ankle edema by evening", "episodes of lightheadedness"),
    "pulmonology": ("productive cough with yellow sputum", "wheezing at night",
                    "dyspnea that worsens in cold air", "pleuritic pain on deep inspiration",
                    "long history of smoking", "low grade fevers for a week"),
    "gastroenterology": ("burning epigastric pain after large meals", "bloating and early satiety",
                         "dark tarry stools", "intermittent diarrhea",
                         "pain worse lying flat after dinner", "loss of appetite"),
    "neurology": ("throbbing unilateral headache with light sensitivity",
                  "spinning sensation when turning the head", "transient word-finding difficulty",
                  "tingling that follows no clear pattern", "episodes of lightheadedness",
                  "unsteady gait over several weeks"),
    "endocrinology": ("polyuria and nocturia", "unintentional weight change",
                      "tremor and heat intolerance", "burning pain in both feet",
                      "intermittent racing heartbeat", "feeling tired all day"),
    "orthopedics": ("pain worse with weight bearing", "stiffness in the morning",
                    "swelling after a twisting injury", "pain radiating down the leg",
                    "reduced range of motion", "tingling in the fingers at night"),
}

GENERIC_SYMPTOMS: tuple[str, ...] = (
    "mild fatigue", "poor sleep", "no fevers or chills", "occasional nausea",
    "stress at work", "no recent travel", "symptoms for about three weeks",
    "tried over the counter medication without relief",
)

EXAM: dict[str, tuple[str, ...]] = {
    "cardiology": ("irregularly irregular rhythm", "grade 2/6 systolic murmur",
                   "jugular venous distension", "pitting edema to mid shin"),
    "pulmonology": ("scattered expiratory wheezes", "crackles at the right base",
                    "decreased breath sounds on the left", "oxygen saturation 91% on room air"),
    "gastroenterology": ("epigastric tenderness", "hepatomegaly", "positive Murphy sign",
                         "hyperactive bowel sounds"),
    "neurology": ("left pronator drift", "nystagmus on lateral gaze",
                  "decreased sensation in a stocking distribution", "positive Romberg sign"),
    "endocrinology": ("enlarged nontender thyroid", "fine tremor of outstretched hands",
                      "acanthosis nigricans", "decreased monofilament sensation in the feet"),
    "orthopedics": ("joint line tenderness", "positive straight leg raise",
                    "painful arc on abduction", "effusion of the right knee"),
}

GENERIC_EXAM: tuple[str, ...] = (
    "alert and oriented", "no acute distress", "vital signs within normal limits",
    "mildly elevated blood pressure", "well appearing", "afebrile",
)

DIAGNOSES: dict[str, tuple[str, ...]] = {
    "cardiology": ("stable angina", "atrial fibrillation",
                   "heart failure with reduced ejection fraction",
                   "hypertensive heart disease", "aortic stenosis"),
    "pulmonology": ("asthma exacerbation", "COPD", "community acquired pneumonia",
                    "pulmonary embolism", "interstitial lung disease"),
    "gastroenterology": ("gastroesophageal reflux disease", "peptic ulcer disease",
                         "biliary colic", "irritable bowel syndrome", "upper GI bleed"),
    "neurology": ("migraine without aura", "transient ischemic attack", "peripheral neuropathy",
                  "benign paroxysmal positional vertigo", "focal seizure"),
    "endocrinology": ("type 2 diabetes mellitus", "hyperthyroidism", "hypothyroidism",
                      "adrenal insufficiency", "diabetic neuropathy"),
    "orthopedics": ("lumbar radiculopathy", "medial meniscus tear", "rotator cuff tendinopathy",
                    "carpal tunnel syndrome", "osteoarthritis of the hip"),
}

PLANS: dict[str, tuple[str, ...]] = {
    "cardiology": ("echocardiogram", "exercise stress test", "start a beta blocker",
                   "Holter monitor for 48 hours", "lipid panel and troponin"),
    "pulmonology": ("chest x-ray", "pulmonary function tests", "inhaled corticosteroid",
                    "CT angiogram of the chest", "sputum culture"),
    "gastroenterology": ("upper endoscopy", "proton pump inhibitor trial",
                         "right upper quadrant ultrasound",
                         "colonoscopy", "H. pylori breath test"),
    "neurology": ("MRI of the brain", "EEG", "nerve conduction study",
                  "start a triptan as needed", "carotid duplex"),
    "endocrinology": ("HbA1c and fasting glucose", "TSH and free T4", "start metformin",
                      "morning cortisol level", "diabetic foot exam referral"),
    "orthopedics": ("MRI of the knee", "physical therapy referral", "lumbar spine x-ray",
                    "corticosteroid injection", "wrist splint at night"),
}

GENERIC_PLANS: tuple[str, ...] = (
    "basic metabolic panel", "follow up in two weeks", "return precautions reviewed",
    "continue current medications", "complete blood count", "lifestyle counselling",
)

COMORBIDITIES: tuple[str, ...] = (
    "hypertension", "hyperlipidemia", "type 2 diabetes", "obesity", "depression",
    "hypothyroidism", "asthma", "osteoarthritis", "GERD", "no significant history",
)
