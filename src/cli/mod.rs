pub mod generate;
pub mod train;
pub mod extract;
