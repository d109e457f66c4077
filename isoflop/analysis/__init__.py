"""Analysis of a finished (or running) sweep, from its tidy table alone.

table (load and validate runs.csv), fits (frontier and power law), bootstrap (resampling runs),
multiplier (compute multipliers), plots, report (fits.json, multipliers.csv, report.md), synthetic
(tables with a known truth, for tests). Entry points: report.run_fit and report.write_report.

Nothing is imported here, so that reading the table contract (table.RUN_COLUMNS) costs no scipy or
matplotlib import.
"""
