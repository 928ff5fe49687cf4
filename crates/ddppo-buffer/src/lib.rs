//! Replay buffers and the k-d tree neighbour index for the gradient loss (ALGORITHM.md sections 1 and 3).
