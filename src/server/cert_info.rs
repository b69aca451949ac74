//! What an operator needs to know of the certificate in force: whom it
//! names and when it expires. Logged whenever it is loaded or reloaded
//! (with a warning once it has less than [`EXPIRY_WARNING`] left), and
//! exported as `keyrouter_tls_certificate_expiry_timestamp_seconds`, so
//! monitoring can alert long before clients start failing handshakes.
//!
//! The subject is no secret: every client receives the certificate in the
//! handshake.

use chrono::{DateTime, Utc};
use rustls_pki_types::CertificateDer;
use std::time::Duration;
use x509_cert::Certificate;
use x509_cert::der::Decode;

/// Less than this left before expiry, and every load says so as a warning.
pub const EXPIRY_WARNING: Duration = Duration::from_secs(14 * 24 * 3600);

/// The served (leaf) certificate's subject and end of validity.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertInfo {
    /// RFC 4514 form, e.g. `CN=gateway.example.com,O=Example`.
    pub subject: String,
    pub not_after: DateTime<Utc>,
}

/// How close a certificate is to its end of validity.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expiry {
    Fine,
    /// Less than [`EXPIRY_WARNING`] left.
    Soon,
    Expired,
}

impl CertInfo {
    /// `None` for a certificate that cannot be read as X.509 here; rustls
    /// accepted it already, and it is served all the same.
    pub fn of(cert: &CertificateDer) -> Option<CertInfo> {
        let tbs = Certificate::from_der(cert.as_ref()).ok()?.tbs_certificate;
        let secs = tbs.validity.not_after.to_unix_duration().as_secs();
        Some(CertInfo {
            subject: tbs.subject.to_string(),
            not_after: DateTime::from_timestamp(i64::try_from(secs).ok()?, 0)?,
        })
    }

    pub fn expiry(&self, now: DateTime<Utc>) -> Expiry {
        if self.not_after <= now {
            Expiry::Expired
        } else if (self.not_after - now).to_std().unwrap_or_default() < EXPIRY_WARNING {
            Expiry::Soon
        } else {
            Expiry::Fine
        }
    }

    /// Logs the certificate now in force; `reloaded` tells a reload from
    /// the start-up load.
    pub fn announce(&self, reloaded: bool, now: DateTime<Utc>) {
        let expires = self.not_after.to_rfc3339();
        if reloaded {
            tracing::info!(subject = %self.subject, expires, "TLS certificate reloaded");
        } else {
            tracing::info!(subject = %self.subject, expires, "TLS certificate loaded");
        }
        match self.expiry(now) {
            Expiry::Fine => {}
            Expiry::Soon => tracing::warn!(
                subject = %self.subject,
                expires,
                "TLS certificate expires in less than 14 days"
            ),
            Expiry::Expired => tracing::error!(
                subject = %self.subject,
                expires,
                "TLS certificate has expired: clients will refuse the handshake"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expiry_is_judged_against_fourteen_days() {
        let now = DateTime::parse_from_rfc3339("2026-11-24T12:00:00Z")
            .unwrap()
            .to_utc();
        let ending = |days: i64, secs: i64| CertInfo {
            subject: "CN=gateway.test".into(),
            not_after: now + chrono::Duration::days(days) + chrono::Duration::seconds(secs),
        };
        assert_eq!(ending(90, 0).expiry(now), Expiry::Fine);
        assert_eq!(ending(14, 0).expiry(now), Expiry::Fine);
        assert_eq!(ending(14, -1).expiry(now), Expiry::Soon);
        assert_eq!(ending(0, 1).expiry(now), Expiry::Soon);
        assert_eq!(ending(0, 0).expiry(now), Expiry::Expired);
        assert_eq!(ending(-3, 0).expiry(now), Expiry::Expired);
    }
}
