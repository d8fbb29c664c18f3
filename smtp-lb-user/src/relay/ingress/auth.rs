//! AUTH PLAIN and LOGIN on submission listeners (RFC 4954).

use base64::Engine as _;
use tracing::{info, warn};

use super::session::{End, Line, Session};

impl Session {
    pub(super) async fn auth_line(&mut self) -> Result<Option<Vec<u8>>, End> {
        self.flush().await?;
        match self.next_line().await? {
            Line::Ok(l) if l != b"*" => {
                Ok(base64::engine::general_purpose::STANDARD.decode(&l).ok())
            }
            _ => Ok(None),
        }
    }

    pub(super) async fn auth(
        &mut self,
        mechanism: &str,
        initial: Option<String>,
    ) -> Result<(), End> {
        if !self.submission || self.shared.users.is_empty() {
            self.error("503 5.5.1 Error: authentication not enabled");
            return Ok(());
        }
        if !self.stream.is_tls() {
            self.error("530 5.7.0 Must issue a STARTTLS command first");
            return Ok(());
        }
        if self.authed.is_some() || self.mail.is_some() {
            self.error("503 5.5.1 Error: already authenticated or in a transaction");
            return Ok(());
        }
        let b64 = base64::engine::general_purpose::STANDARD;
        let creds = match mechanism {
            "PLAIN" => {
                let raw = match initial {
                    Some(i) if i == "=" => Some(Vec::new()),
                    Some(i) => b64.decode(i.as_bytes()).ok(),
                    None => {
                        self.reply("334 ");
                        self.auth_line().await?
                    }
                };
                raw.and_then(|r| {
                    let mut parts = r.split(|&b| b == 0);
                    let _authz = parts.next()?;
                    let user = String::from_utf8(parts.next()?.to_vec()).ok()?;
                    let pass = String::from_utf8(parts.next()?.to_vec()).ok()?;
                    Some((user, pass))
                })
            }
            "LOGIN" => {
                let user = if let Some(i) = initial {
                    b64.decode(i.as_bytes()).ok()
                } else {
                    self.reply("334 VXNlcm5hbWU6");
                    self.auth_line().await?
                };
                match user {
                    Some(user) => {
                        self.reply("334 UGFzc3dvcmQ6");
                        self.auth_line().await?.and_then(|pass| {
                            Some((String::from_utf8(user).ok()?, String::from_utf8(pass).ok()?))
                        })
                    }
                    None => None,
                }
            }
            _ => {
                self.error("504 5.5.4 Unrecognized authentication type");
                return Ok(());
            }
        };
        match creds {
            Some((user, pass)) if self.shared.users.get(&user).is_some_and(|p| *p == pass) => {
                info!(peer = %self.peer, user, "authenticated");
                self.authed = Some(user);
                self.reply("235 2.7.0 Authentication successful");
            }
            _ => {
                warn!(peer = %self.peer, "authentication failed");
                self.error("535 5.7.8 Error: authentication failed");
            }
        }
        Ok(())
    }
}
