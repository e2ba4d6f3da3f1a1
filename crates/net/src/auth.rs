//! The join token: a shared secret every RPC carries as `authorization: Bearer <token>`,
//! checked by the server in constant time. Never logged or written to the run directory.

use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::{Request, Status};

/// A secret shared by the server and its workers.
#[derive(Clone)]
pub struct Token(String);

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

/// A join token that cannot be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Nothing but spaces.
    #[error("the join token is empty")]
    Empty,
    /// Too short to be a secret.
    #[error("the join token is shorter than 16 characters; use a long random one (e.g. `openssl rand -hex 32`)")]
    TooShort,
    /// It cannot travel in an HTTP header.
    #[error("the join token must be printable ASCII without spaces")]
    NotPrintable,
}

impl Token {
    /// A token; refuses empty ones and ones that cannot travel in an HTTP header.
    pub fn new(secret: impl Into<String>) -> Result<Self, TokenError> {
        let s: String = secret.into().trim().to_string();
        if s.is_empty() {
            return Err(TokenError::Empty);
        }
        if s.len() < 16 {
            return Err(TokenError::TooShort);
        }
        if !s.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(TokenError::NotPrintable);
        }
        Ok(Token(s))
    }

    fn header(&self) -> MetadataValue<Ascii> {
        format!("Bearer {}", self.0).parse().expect("checked printable ASCII")
    }
}

/// Equality whose running time does not depend on where the inputs differ.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Server side: rejects requests without the right token (`UNAUTHENTICATED`); lets all
/// through when no token is configured.
#[derive(Clone, Debug)]
pub struct CheckToken(pub Option<Token>);

impl Interceptor for CheckToken {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        let Some(token) = &self.0 else { return Ok(req) };
        match req.metadata().get("authorization") {
            None => Err(Status::unauthenticated(
                "this parameter server requires a join token; give workers the same token (QUORUM_TOKEN or token-file)",
            )),
            Some(v) if constant_time_eq(v.as_bytes(), token.header().as_bytes()) => Ok(req),
            Some(_) => Err(Status::unauthenticated("wrong join token")),
        }
    }
}

/// Client side: adds the token to every request.
#[derive(Clone, Debug)]
pub struct AddToken(pub Option<Token>);

impl Interceptor for AddToken {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        if let Some(t) = &self.0 {
            req.metadata_mut().insert("authorization", t.header());
        }
        Ok(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constant_time_eq_is_equality() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
    }

    #[test]
    fn tokens_are_checked_and_never_printed() {
        assert_eq!(Token::new("short").unwrap_err(), TokenError::TooShort);
        assert!(TokenError::TooShort.to_string().contains("16 characters"));
        assert_eq!(Token::new("has a space in it somewhere").unwrap_err(), TokenError::NotPrintable);
        let t = Token::new("0123456789abcdef0123").unwrap();
        assert_eq!(format!("{t:?}"), "Token(<redacted>)");
    }

    #[test]
    fn the_interceptor_rejects_missing_and_wrong_tokens() {
        let t = Token::new("0123456789abcdef0123").unwrap();
        let mut check = CheckToken(Some(t.clone()));
        let e = check.call(Request::new(())).unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
        let mut wrong = AddToken(Some(Token::new("0123456789abcdef0124").unwrap()));
        let e = check.call(wrong.call(Request::new(())).unwrap()).unwrap_err();
        assert_eq!(e.message(), "wrong join token");
        let mut right = AddToken(Some(t));
        assert!(check.call(right.call(Request::new(())).unwrap()).is_ok());
    }
}
