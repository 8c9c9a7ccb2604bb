//! qat-report: turns the tools' outputs into things people read — PNG loss curves from
//! `train_log.jsonl` files (several runs on one chart) and Markdown tables of eval JSONs.

pub mod error;
pub mod log;
pub mod plot;
pub mod table;

pub use error::{ReportError, Result};
pub use log::{default_label, default_labels, read_log, Metric, Point, Run, XAxis};
pub use plot::{render_png, PlotConfig, PALETTE};
pub use table::{markdown_table, parse_eval, read_eval, EvalRecord, PplRecord, ZeroShotRecord};
