//! Limits per network address (`[limits] address_*`, docs/security.md), against the real
//! `iim-host` binary: an address over a limit is answered `rate_limited` with the time to wait,
//! and another address is not affected. Loopback is exempt by default; these hosts exempt
//! nothing, and 127.0.0.2 stands for another client's address.

use anyhow::ensure;
use iim_client::proto::{ClientFrame, DeviceId, ErrorCode, ServerFrame, SessionMode, UserId};
use iim_client::{ClientError, Connection};
use iim_e2e::*;

type Result = anyhow::Result<()>;

/// The refusal's code and message.
fn refusal<T: std::fmt::Debug>(
    result: std::result::Result<T, ClientError>,
) -> anyhow::Result<(ErrorCode, String)> {
    match result {
        Err(ClientError::Refused { code, message })
        | Err(ClientError::ClosedByHost { code, message }) => Ok((code, message)),
        other => anyhow::bail!("expected a refusal, got {other:?}"),
    }
}

/// A raw connection from `from` that said hello.
async fn raw_from(host: &HostProcess, from: &str) -> anyhow::Result<RawConnection> {
    let mut raw = RawConnection::open_from(host, from.parse()?).await?;
    let hello = ClientFrame::Hello {
        version: iim_client::proto::PROTOCOL_VERSION,
        agent: "limits test".into(),
    };
    raw.send
        .write_all(&iim_client::proto::encode_frame(&hello, 1024)?)
        .await?;
    Ok(raw)
}

async fn login(
    host: &HostProcess,
    user: &UserId,
    password: &str,
) -> std::result::Result<Connection, ClientError> {
    let conn = Connection::connect(&host.client_config().expect("config")).await?;
    conn.login(
        user,
        password,
        &DeviceId::new("phone").expect("valid"),
        SessionMode::Receive,
    )
    .await?;
    Ok(conn)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registrations_and_log_ins_over_an_address_s_limit_are_refused_and_another_address_is_not()
-> Result {
    let host = HostProcess::start_chat_only_with_config(
        "[limits]\naddress_exempt = []\naddress_register_burst = 2\n\
         address_registrations_per_hour = 1\naddress_login_burst = 3\n\
         address_logins_per_minute = 1\n",
    )?;
    // Two registrations, each on a connection of its own (the limit per connection is not
    // what refuses the third).
    let alice = host.register("alice").await?;
    host.register("bob").await?;
    let conn = host.connect().await?;
    let (code, message) = refusal(conn.register(&UserId::new("carol")?, PASSWORD).await)?;
    assert_eq!(code, ErrorCode::RATE_LIMITED);
    ensure!(
        message.starts_with("too many registrations from your address; try again in "),
        "{message}"
    );
    conn.close().await;

    // Three password log-ins (one of them wrong), then the right password is refused too.
    login(&host, &alice, PASSWORD).await?.close().await;
    let wrong = login(&host, &alice, "not the password at all")
        .await
        .map(drop);
    assert_eq!(code_of(wrong)?, ErrorCode::AUTH_FAILED);
    login(&host, &alice, PASSWORD).await?.close().await;
    let (code, message) = refusal(login(&host, &alice, PASSWORD).await.map(drop))?;
    assert_eq!(code, ErrorCode::RATE_LIMITED);
    ensure!(
        message.starts_with("too many log-in attempts from your address; try again in "),
        "{message}"
    );

    // Another address registers and logs in.
    let mut other = raw_from(&host, "127.0.0.2").await?;
    let register = ClientFrame::Register {
        req: 1,
        user: UserId::new("dave")?,
        password: PASSWORD.into(),
    };
    let answer = other.request(1, &register).await?;
    ensure!(matches!(answer, ServerFrame::Ok { req: 1 }), "{answer:?}");
    let login_frame = ClientFrame::Login {
        req: 2,
        user: alice.clone(),
        password: PASSWORD.into(),
        device: DeviceId::new("laptop")?,
        mode: SessionMode::Receive,
    };
    let answer = other.request(2, &login_frame).await?;
    ensure!(
        matches!(answer, ServerFrame::LoggedIn { req: 2, .. }),
        "{answer:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_past_an_address_s_limit_is_closed_with_rate_limited() -> Result {
    let host = HostProcess::start_chat_only_with_config(
        "[limits]\naddress_exempt = []\naddress_max_connections = 3\n",
    )?;
    let mut open = Vec::new();
    for _ in 0..3 {
        open.push(host.connect().await?);
    }
    // Closed as soon as its handshake is done: whatever it asks first is not answered.
    let fourth = match Connection::connect(&host.client_config()?).await {
        Ok(conn) => conn.register(&UserId::new("frank")?, PASSWORD).await,
        Err(e) => Err(e),
    };
    let (code, message) = refusal(fourth)?;
    assert_eq!(code, ErrorCode::RATE_LIMITED);
    ensure!(
        message.starts_with("too many open connections from your address"),
        "{message}"
    );
    // Another address is not affected.
    let mut other = raw_from(&host, "127.0.0.2").await?;
    let register = ClientFrame::Register {
        req: 1,
        user: UserId::new("erin")?,
        password: PASSWORD.into(),
    };
    let answer = other.request(1, &register).await?;
    ensure!(matches!(answer, ServerFrame::Ok { req: 1 }), "{answer:?}");
    // One closes: a new one is taken (once the host has seen the close).
    open.pop().expect("three").close().await;
    within("a connection taken again", async {
        loop {
            if let Ok(conn) = Connection::connect(&host.client_config()?).await
                && conn.register(&UserId::new("gina")?, PASSWORD).await.is_ok()
            {
                return anyhow::Ok(conn);
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    })
    .await??;
    Ok(())
}
