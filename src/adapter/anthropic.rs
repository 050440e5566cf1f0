//! Anthropic Messages (`POST /v1/messages`). Being written: see issue 6.

use super::{Adapter, Answer, ReplyCtx, StreamTranslator, Target, UpstreamRequest};
use crate::error::ApiError;
use crate::wire::openai::ChatRequest;

/// The Anthropic Messages adapter.
pub struct Anthropic;

impl Adapter for Anthropic {
    fn request(&self, _t: &Target<'_>, _r: &ChatRequest) -> Result<UpstreamRequest, ApiError> {
        Err(ApiError::invalid_request("not yet", None))
    }
    fn answer(&self, _b: &[u8], _c: &ReplyCtx) -> Result<Answer, String> {
        Err("not yet".into())
    }
    fn stream(&self, _c: ReplyCtx) -> Box<dyn StreamTranslator> {
        unimplemented!()
    }
    fn error_detail(&self, _b: &[u8]) -> Option<String> {
        None
    }
}
