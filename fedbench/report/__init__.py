"""Reports: tables (Markdown, HTML, LaTeX, CSV) and seaborn plots from a results store."""
