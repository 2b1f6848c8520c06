//! One-step-deviation credit assignment, the episode scheduler and the online learning loop.
