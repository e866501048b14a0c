//! Dense host tensors: the f32 row-major storage every loader produces and the CPU backend consumes.

/// A row-major f32 tensor with an explicit shape. Weights are dequantized to f32 at load.
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    /// Dimensions, outermost first (HF convention: a linear weight is `[out_features, in_features]`).
    pub shape: Vec<usize>,
    /// `shape.iter().product()` values in row-major order.
    pub data: Vec<f32>,
}

impl Tensor {
    /// Wraps `data` with `shape`; panics if the sizes disagree (a loader bug, not user input).
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Self {
        assert_eq!(
            shape.iter().product::<usize>(),
            data.len(),
            "tensor shape {shape:?} does not match {} values",
            data.len()
        );
        Self { shape, data }
    }

    /// An all-zero tensor of `shape`.
    pub fn zeros(shape: Vec<usize>) -> Self {
        let n = shape.iter().product();
        Self::new(shape, vec![0.0; n])
    }

    /// Number of rows of a 2-D tensor (`shape[0]`).
    pub fn rows(&self) -> usize {
        self.shape[0]
    }

    /// Number of columns of a 2-D tensor (product of the trailing dimensions).
    pub fn cols(&self) -> usize {
        self.shape[1..].iter().product()
    }

    /// Row `i` of a 2-D tensor.
    pub fn row(&self, i: usize) -> &[f32] {
        let c = self.cols();
        &self.data[i * c..(i + 1) * c]
    }

    /// True when every value is finite (adapters and models with NaN/Inf are refused).
    pub fn all_finite(&self) -> bool {
        self.data.iter().all(|v| v.is_finite())
    }
}
