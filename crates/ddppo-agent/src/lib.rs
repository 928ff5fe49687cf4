//! SAC critic, back-prop-through-model policy update and training loop (ALGORITHM.md sections 1, 4, 5, 6).
