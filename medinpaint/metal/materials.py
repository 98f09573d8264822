"""X-ray attenuation of the materials the metal simulator needs, from the committed NIST tables.

The tables live in ``data/`` so that a simulation never depends on network access; mixtures
(cobalt-chrome, amalgam) are built here with the mixture rule so their provenance stays the
element tables.
"""

from __future__ import annotations

import csv
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

DATA = Path(__file__).resolve().parent / "data"
METALS = ("titanium", "iron", "cocr", "amalgam")
E_MIN_KEV = 10.0
E_MAX_KEV = 150.0


def _rows(name: str):
    with open(DATA / name, newline="") as handle:
        lines = [line for line in handle if not line.startswith("#") and line.strip()]
    return list(csv.DictReader(lines))


@lru_cache(maxsize=None)
def _substances() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    table: dict[str, list[tuple[float, float]]] = {}
    for row in _rows("mass_attenuation_nist.csv"):
        table.setdefault(row["substance"], []).append((float(row["energy_keV"]), float(row["mu_over_rho_cm2_g"])))
    return {k: (np.array([e for e, _ in v]), np.array([m for _, m in v])) for k, v in table.items()}


@lru_cache(maxsize=None)
def _materials() -> dict[str, tuple[float, dict[str, float]]]:
    out = {}
    for row in _rows("materials.csv"):
        parts = dict(p.split(":") for p in row["composition_by_weight"].split(";"))
        weights = {k: float(w) for k, w in parts.items()}
        total = sum(weights.values())
        out[row["material"]] = (float(row["density_g_cm3"]), {k: w / total for k, w in weights.items()})
    return out


def materials() -> tuple[str, ...]:
    return tuple(_materials())


def density(material: str) -> float:
    """Nominal density in g/cm^3 (the value the CSV documents)."""
    return _check(material)[0]


def _check(material: str):
    table = _materials()
    if material not in table:
        raise ValueError(f"unknown material {material!r}; choose from {', '.join(table)}")
    return table[material]


def _loglog(energies: np.ndarray, grid: np.ndarray, values: np.ndarray) -> np.ndarray:
    # Rows sharing an energy are an absorption edge: searchsorted(side="right") puts an energy at
    # or above the edge into the above-edge interval and one below it into the below-edge one.
    idx = np.clip(np.searchsorted(grid, energies, side="right") - 1, 0, len(grid) - 2)
    same = grid[idx + 1] == grid[idx]
    idx = np.where(same, np.maximum(idx - 1, 0), idx)
    e0, e1 = grid[idx], grid[idx + 1]
    m0, m1 = values[idx], values[idx + 1]
    t = (np.log(energies) - np.log(e0)) / (np.log(e1) - np.log(e0))
    return np.exp(np.log(m0) + t * (np.log(m1) - np.log(m0)))


def mass_attenuation(material: str, energies_kev) -> np.ndarray:
    """mu/rho in cm^2/g, log-log interpolated between the NIST energies (mixture rule for alloys)."""
    _, composition = _check(material)
    e = np.asarray(energies_kev, dtype=np.float64)
    if np.any(e < E_MIN_KEV) or np.any(e > E_MAX_KEV):
        raise ValueError(f"energies must lie in [{E_MIN_KEV:g}, {E_MAX_KEV:g}] keV, the range of the committed tables")
    subs = _substances()
    return sum(w * _loglog(e, *subs[name]) for name, w in composition.items())


def mu(material: str, energies_kev, density_g_cm3: float | None = None) -> torch.Tensor:
    """Linear attenuation in 1/mm (the unit the projectors integrate in), float64 tensor."""
    rho = density(material) if density_g_cm3 is None else float(density_g_cm3)
    if rho < 0:
        raise ValueError(f"density must be >= 0, got {rho}")
    return torch.as_tensor(mass_attenuation(material, energies_kev) * rho / 10.0)


@lru_cache(maxsize=None)
def _spectrum_arrays() -> tuple[np.ndarray, np.ndarray]:
    rows = _rows("spectrum_120kvp.csv")
    e = np.array([float(r["energy_keV"]) for r in rows])
    f = np.array([float(r["relative_fluence"]) for r in rows])
    return e, f / f.sum()


def spectrum_120kvp() -> tuple[torch.Tensor, torch.Tensor]:
    """(bin centre energies in keV, photon fraction per 1 keV bin summing to 1)."""
    e, f = _spectrum_arrays()
    return torch.as_tensor(e), torch.as_tensor(f)


def effective_energy() -> float:
    """Energy whose water attenuation equals the spectrum's thin-water attenuation.

    HU is defined against water, so this is the energy at which the simulator converts HU to
    densities; any choice works as long as the forward and inverse conversions agree.
    """
    e, f = _spectrum_arrays()
    mu_w = float((f * mass_attenuation("water", e)).sum())
    grid = np.linspace(E_MIN_KEV, E_MAX_KEV, 1401)
    return float(grid[np.argmin(np.abs(mass_attenuation("water", grid) - mu_w))])
