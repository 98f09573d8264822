"""Rebuild the damaged sample from the clean one: 4 blanked slices and 1 corrupt (noise-ridden) slice.

Run from the repository root: python sample_data/make_damaged.py
"""

from pathlib import Path

import numpy as np

import medinpaint
from medinpaint.data.save import write_file
from medinpaint.simulate import simulate

HERE = Path(__file__).resolve().parent
clean = medinpaint.load(HERE / "ct_abdomen_3mm.nii.gz")
damaged, truth = simulate(clean, "slices", seed=7, count=5, run=1)
bad = sorted(set(np.nonzero(truth.any(axis=(0, 1)))[0].tolist()))
corrupt = bad[-1]  # the last one is corrupted instead of blanked: a slice read with a broken detector
rng = np.random.default_rng(7)
array = damaged.array
array[:, :, corrupt] = clean.array[:, :, corrupt] + rng.normal(0, 400, size=array.shape[:2]).astype(np.float32)
write_file(damaged.with_array(array), HERE / "ct_abdomen_3mm_damaged.nii.gz", "nifti", "int32",
           f"medinpaint sample: slices {bad[:-1]} blanked, {corrupt} corrupt")
write_file(clean.with_array(truth.astype(np.uint8)), HERE / "ct_abdomen_3mm_damaged_desc-damage_mask.nii.gz", "nifti",
           "uint8", "damaged slices of the sample")
print(f"blanked {bad[:-1]}, corrupt {corrupt}")
