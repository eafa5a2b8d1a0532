//! Metrica Fleet OS imager: recipes to images, bundles, keys.

pub mod bundle;
pub mod cli;
pub mod keys;
