"""QM9 property names and units as EDM reports them (Hoogeboom et al. 2022, Table 3)."""

PROPERTIES: tuple[str, ...] = ("alpha", "gap", "homo", "lumo", "mu", "Cv")

UNITS: dict[str, str] = {
    "alpha": "Bohr^3",
    "gap": "meV",
    "homo": "meV",
    "lumo": "meV",
    "mu": "D",
    "Cv": "cal/(mol K)",
}

HARTREE_TO_MEV = 27211.4
