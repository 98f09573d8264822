"""Regenerate spectrum_120kvp.csv (run: python -m medinpaint.metal.data.generate_spectrum).

Semi-empirical, not measured: Kramers' thick-target continuum N(E) ~ (kVp - E) / E photons per keV,
plus tungsten K lines, filtered by 2.5 mm Al + 0.9 mm Ti using the committed NIST tables.
"""

from __future__ import annotations

import numpy as np

from medinpaint.metal.materials import DATA, density, mass_attenuation

KVP = 120.0
AL_MM = 2.5
TI_MM = 0.9
# Tungsten K lines (keV) with relative intensities (Ka2, Ka1, Kb1, Kb2); their total photon count is set
# to K_FRACTION of the unfiltered continuum above the W K edge (69.5 keV), a typical 120 kVp proportion.
K_LINES = ((57.98, 0.58), (59.32, 1.00), (67.24, 0.33), (69.07, 0.09))
K_EDGE = 69.525
K_FRACTION = 0.2


def spectrum() -> tuple[np.ndarray, np.ndarray]:
    e = np.arange(10.5, KVP, 1.0)  # 1 keV bins centred on x.5, from 10 to 120 keV
    fluence = (KVP - e) / e
    lines = np.zeros_like(e)
    weights = np.array([w for _, w in K_LINES])
    total = K_FRACTION * fluence[e > K_EDGE].sum()
    for (energy, _), w in zip(K_LINES, weights / weights.sum()):
        lines[int(energy - 10.0)] += total * w
    fluence = fluence + lines
    filt = AL_MM * density("aluminium") * mass_attenuation("aluminium", e) + TI_MM * density("titanium") * mass_attenuation("titanium", e)
    fluence = fluence * np.exp(-filt / 10.0)
    return e, fluence / fluence.sum()


def main() -> None:
    e, f = spectrum()
    with open(DATA / "spectrum_120kvp.csv", "w") as out:
        out.write("# 120 kVp tungsten-anode spectrum, semi-empirical (see README.md): Kramers continuum + W K lines,\n")
        out.write(f"# filtered by {AL_MM} mm Al + {TI_MM} mm Ti (NIST mu/rho). Photon fraction per 1 keV bin (sums to 1).\n")
        out.write("energy_keV,relative_fluence\n")
        for ei, fi in zip(e, f):
            out.write(f"{ei:.1f},{fi:.6e}\n")


if __name__ == "__main__":
    main()
