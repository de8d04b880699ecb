"""What makes predictions into results: the metric, CV scores and prediction tables, the patient folds, Kaggle
submissions, where a CNN looks (Grad-CAM, the pointing game). Stands on networks and below."""
