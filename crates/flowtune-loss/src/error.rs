//! Errors of the loss functions.

/// Everything that can go wrong in `flowtune-loss`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An input tensor has the wrong shape.
    #[error("`{arg}` has shape {got:?}, expected {expected}")]
    Shape {
        /// The argument at fault.
        arg: &'static str,
        /// Its shape.
        got: Vec<i64>,
        /// What was expected, in words.
        expected: String,
    },
    /// An input tensor has the wrong dtype.
    #[error("`{arg}` has dtype {got:?}, expected {expected}")]
    Dtype {
        /// The argument at fault.
        arg: &'static str,
        /// Its dtype.
        got: tch::Kind,
        /// What was expected.
        expected: &'static str,
    },
    /// A scalar argument is out of range.
    #[error("`{arg}` = {value} is invalid: {reason}")]
    Value {
        /// The argument at fault.
        arg: &'static str,
        /// Its value.
        value: f64,
        /// Why.
        reason: &'static str,
    },
    /// A label id is outside the vocabulary or a target index outside the label set.
    #[error("`{arg}` index {index} out of range 0..{bound}")]
    Index {
        /// The argument at fault.
        arg: &'static str,
        /// The bad index.
        index: i64,
        /// The exclusive bound.
        bound: i64,
    },
    /// A libtorch operation failed.
    #[error("torch error: {0}")]
    Torch(#[from] tch::TchError),
}

/// Result alias of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
