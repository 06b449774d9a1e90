//! placeholder replaced by the test author
mod common;
#[allow(unused_imports)]
use common::*;
