//! Prediction and gradient ensembles (ALGORITHM.md sections 2 and 3).
