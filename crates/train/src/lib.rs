//! Quantization-aware training by distillation from cached teacher shards.

mod adamw_kernels;
pub mod balance;
pub mod data;
pub mod distill;
pub mod error;
pub mod gamma;
pub mod grad_sum;
pub mod loss;
pub mod optim;
pub mod parallel;
pub mod student;
pub mod sum_squares;

pub use data::{DataCursor, Prefetch, ShardBatches};
pub use distill::{run, Budget, DistillConfig, DistillSummary, TrainSettings};
pub use error::{Result, TrainError};
pub use gamma::{teacher_confidence, TeacherConfidence};
pub use loss::{forward_kl, Loss, LossKind, TopKTargets};
pub use optim::{AdamW, AdamWConfig, LrConfig, Schedule};
pub use student::Student;
