"""A replica of PI-CAI as distributed, of empty files (discovery reads names only): `replica`
writes its fold folders, expert and AI-derived labels and marksheet (`MARKSHEET`); `touch`
writes one empty file."""

from __future__ import annotations

MARKSHEET = [
    "patient_id,study_id,lesion_GS,lesion_ISUP,case_ISUP,case_csPCa",
    '10000,1000000,"4+3,3+4","3,2",3,YES',
    "10001,1000001,0+0,0,0,NO",
    "10002,1000002,N/A,N/A,0,NO",
    '10003,1000003,"3+4,4+3,N/A","2,3,N/A",3,YES',
    "10003,1000004,4+4,4,4,YES",
]


def touch(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def replica(root, fold_of=None):
    """PI-CAI file names (empty files: discovery reads names only): patient 10003 has two
    studies; 10002 lies in fold 3's folder; `_cor`/`_sag` beside every T2w; expert labels for
    10000 and 10003_1000003, AI labels for 10000, 10001 and 10003_1000004."""
    fold_of = fold_of or {"10000": 0, "10001": 0, "10002": 3, "10003": 0}
    for case in ("10000_1000000", "10001_1000001", "10002_1000002", "10003_1000003",
                 "10003_1000004"):  # fmt: skip
        patient = case.split("_")[0]
        folder = root / f"picai_public_images_fold{fold_of[patient]}" / patient
        for name in ("t2w", "adc", "hbv", "cor", "sag"):
            touch(folder / f"{case}_{name}.mha")
    human = root / "human_expert" / "resampled"
    ai = root / "AI" / "Bosma22a"
    for case in ("10000_1000000", "10003_1000003"):
        touch(human / f"{case}.nii.gz")
    for case in ("10000_1000000", "10001_1000001", "10003_1000004"):
        touch(ai / f"{case}.nii.gz")
    (root / "marksheet.csv").write_text("\n".join(MARKSHEET) + "\n")
    return human, ai
