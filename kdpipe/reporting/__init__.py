"""The run report: Markdown, figures, plots and the representation analysis."""
