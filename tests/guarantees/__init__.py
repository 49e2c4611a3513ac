"""One file per guarantee of DESIGN.md ("Guarantees"), named after it, holding that guarantee's
tests: mostly against real processes, in process where the guarantee is the code's."""
