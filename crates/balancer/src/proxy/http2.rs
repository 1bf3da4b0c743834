//! stub
use super::Io;
use crate::Shared;
use std::net::SocketAddr;
use std::sync::Arc;
pub(crate) async fn serve<S: Io>(_: Arc<Shared>, _: S, _: SocketAddr, _: bool) {}
