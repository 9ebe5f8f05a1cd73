//! The integration tests, as one crate (it links once). One module per topic; shared
//! toy models and helpers in `common`.

mod common;

mod awrs;
mod bad_input;
mod bias;
mod cli;
mod exact_smc;
mod grammar_charlevel;
mod grammar_exact;
mod lm_cache;
mod lm_device;
mod lm_examples;
mod lm_families;
mod lm_files;
mod lm_formats;
mod lm_real;
mod lm_timing;
mod lm_tiny;
mod lm_tokenizers;
mod potential_consistency;
mod programs;
mod real_text;
mod report_browser;
mod resampling;
