pub mod generate;
pub mod train;
