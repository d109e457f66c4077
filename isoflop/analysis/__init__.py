"""Analysis of a finished (or running) sweep, from its tidy table alone.

table (load and validate runs.csv); fits (the frontier and its power law L(C) = E + A C^-alpha);
approach2 (minima of the IsoFLOP curves and power laws through them); approach3 (the surface
L(N, D) = E + A/N^alpha + B/D^beta, Huber on log-loss, closed-form optimum); allocation (N_opt(C),
D_opt(C) with bands); methods (one interface over the three); bootstrap (the paired bootstrap over
budgets and sizes, shared by all architectures); multiplier (M(C), its band, P(M > 1), the
wall-clock variant); outliers (flagged runs, with reasons); plots; report (fits.json,
multipliers.csv, report.md); synthetic (tables with a known truth) and bias (each method's bias on
them); huber and blas (the loss, and one BLAS thread for the many tiny solves). docs/analysis.md
describes the methods. Entry points: report.run_fit and report.write_report.

Nothing is imported here, so that reading the table contract (table.RUN_COLUMNS) costs no scipy or
matplotlib import.
"""
