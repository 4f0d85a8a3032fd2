"""The shared training engine: one loop (`loop.train`), its optimizer/schedule, checkpoints and logs."""
