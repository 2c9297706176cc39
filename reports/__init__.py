"""Study reports: a study's MLflow runs turned into tables, figures and a notebook that
rebuilds itself (`python -m reports.build --experiment NAME`)."""
