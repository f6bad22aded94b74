"""Above the models: parameter and FLOP accounting, routing inspection, plots and reports."""
