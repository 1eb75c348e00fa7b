pub mod extract;
pub mod generate;
pub mod train;
