pub mod bench;
pub mod broker;
pub mod demo;
