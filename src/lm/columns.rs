//! An output matrix written by parallel tasks that each own a run of its columns.
//!
//! The products `y = x Wᵀ` (`y: [n, m]`, row-major) split the work by weight rows, which
//! are `y`'s columns: each task writes `y[r][j]` for every activation row `r` and its own
//! columns `j`, so no two tasks touch one element, but no task's elements form one slice.
//! Tasks write through a shared pointer instead, into memory not zeroed first (each
//! element is written exactly once), which is what `Vec<f32>` slices cannot express.

/// Rows × columns of `f32`, written once per element by tasks owning disjoint columns.
pub(crate) struct ColumnWriter {
    data: Vec<f32>,
    rows: usize,
    cols: usize,
}

/// A task's handle on a [`ColumnWriter`]'s memory.
#[derive(Clone, Copy)]
pub(crate) struct Columns {
    ptr: *mut f32,
    rows: usize,
    cols: usize,
}

// SAFETY: tasks write disjoint elements through it (the contract of `Columns::write`), and
// the memory outlives them (it belongs to the `ColumnWriter` the caller holds).
unsafe impl Send for Columns {}
unsafe impl Sync for Columns {}

impl ColumnWriter {
    /// Room for `rows × cols` elements, none written yet.
    pub(crate) fn new(rows: usize, cols: usize) -> Self {
        Self {
            data: Vec::with_capacity(rows * cols),
            rows,
            cols,
        }
    }

    /// The handle for the tasks.
    pub(crate) fn columns(&mut self) -> Columns {
        Columns {
            ptr: self.data.as_mut_ptr(),
            rows: self.rows,
            cols: self.cols,
        }
    }

    /// The matrix, row-major.
    ///
    /// # Safety
    /// Every element `(r, j)` with `r < rows`, `j < cols` has been written through
    /// [`Columns::write`] (and the tasks have finished).
    pub(crate) unsafe fn finish(mut self) -> Vec<f32> {
        // SAFETY: the capacity is at least `rows · cols` (`new`); those elements are
        // initialised (caller).
        unsafe { self.data.set_len(self.rows * self.cols) };
        self.data
    }
}

impl Columns {
    /// Write `v` at row `r`, column `j`; out of range is ignored (never reached by the
    /// products: their loops stay inside the shape; checked so that a slip cannot write
    /// outside the buffer).
    ///
    /// # Safety
    /// No other task writes `(r, j)` (each task writes only its own columns).
    #[inline(always)]
    pub(crate) unsafe fn write(self, r: usize, j: usize, v: f32) {
        if r < self.rows && j < self.cols {
            // SAFETY: inside the allocation (checked just above); no one else writes
            // this element (caller).
            unsafe { self.ptr.add(r * self.cols + j).write(v) };
        }
    }
}

#[cfg(test)]
mod tests {
    use rayon::prelude::*;

    use super::*;

    /// Parallel tasks owning runs of three columns fill a 5 × 10 matrix row-major; a write
    /// outside the shape is dropped.
    #[test]
    fn tasks_fill_their_columns() {
        let (rows, cols) = (5, 10);
        let mut y = ColumnWriter::new(rows, cols);
        let out = y.columns();
        (0..cols.div_ceil(3)).into_par_iter().for_each(|t| {
            for j in 3 * t..(3 * t + 3).min(cols) {
                for r in 0..rows {
                    // SAFETY: column j belongs to task t alone.
                    unsafe { out.write(r, j, (r * 100 + j) as f32) };
                }
            }
        });
        // SAFETY: out of range: ignored.
        unsafe { out.write(rows, 0, -1.0) };
        // SAFETY: every element was written above.
        let y = unsafe { y.finish() };
        let want: Vec<f32> = (0..rows * cols)
            .map(|i| ((i / cols) * 100 + i % cols) as f32)
            .collect();
        assert_eq!(y, want);
    }
}
