"""What is made of finished runs, deciding none of their numbers: tables, figures, the claims'
verdicts, the benchmark against the fused kernels, the overhead of a run and the plan of a
config's cost."""
