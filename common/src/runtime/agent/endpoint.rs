//! The QUIC endpoint: transport settings (windows, keep-alive, idle timeout, congestion
//! control), the server and client configs, and the keys derived from the agent's own key
//! (stateless resets, connection ids) so that a restarted agent ends its old connections at
//! once.

use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};

use super::{Shared, MAX_STREAMS};
use crate::runtime::config::{AgentConfig, Transport};
use crate::runtime::tls::RefusalSlot;

pub(super) fn transport_config(cfg: &AgentConfig) -> Result<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(cfg.keep_alive));
    t.max_idle_timeout(Some(cfg.idle_timeout.try_into()?));
    t.max_concurrent_bidi_streams(MAX_STREAMS.into());
    t.max_concurrent_uni_streams(0u32.into());
    // Windows sized for a ~100 ms × 1 Gbit/s path (12.5 MB in flight); quinn's defaults
    // target much smaller links. The send window is kept near that product rather than far
    // above it: data it buffers beyond what the link carries only delays the backpressure
    // that tells the sender the link, not the CPU, is the bound (pump::LevelControl).
    // quinn's default initial RTT (333 ms) puts the first Initial retransmission a second after
    // the first: a dial that races the peer's restart would wait that long. 100 ms is still
    // above any EEA path's RTT.
    t.initial_rtt(Duration::from_millis(100));
    use crate::runtime::config::CongestionControl as Cc;
    use quinn::congestion as cc;
    match cfg.congestion_control {
        Cc::Bbr => t.congestion_controller_factory(Arc::new(cc::BbrConfig::default())),
        Cc::Cubic => t.congestion_controller_factory(Arc::new(cc::CubicConfig::default())),
        Cc::NewReno => t.congestion_controller_factory(Arc::new(cc::NewRenoConfig::default())),
    };
    t.stream_receive_window((16u32 << 20).into());
    t.receive_window((64u32 << 20).into());
    t.send_window(16 << 20);
    Ok(t)
}

pub(super) fn make_endpoint(shared: &Arc<Shared>) -> Result<quinn::Endpoint> {
    let transport = Arc::new(transport_config(&shared.cfg)?);
    let bind: SocketAddr = match &shared.cfg.transport {
        Transport::Listen(a) => *a,
        Transport::Connect { addr, .. } => {
            let remote = addr
                .to_socket_addrs()
                .with_context(|| format!("resolving {addr}"))?
                .next()
                .with_context(|| format!("{addr} resolves to no address"))?;
            if remote.is_ipv4() {
                "0.0.0.0:0".parse()?
            } else {
                "[::]:0".parse()?
            }
        }
    };
    let socket = std::net::UdpSocket::bind(bind)
        .with_context(|| format!("binding UDP {bind} (is another agent running?)"))?;
    {
        // Larger kernel buffers absorb bursts at high bandwidth-delay products.
        let s = socket2::SockRef::from(&socket);
        let _ = s.set_recv_buffer_size(8 << 20);
        let _ = s.set_send_buffer_size(8 << 20);
    }
    // Whether the kernel batches datagrams for quinn (GSO: one send of many datagrams; GRO: one
    // receive of many): without them every 1452-byte datagram costs a system call.
    if let Ok(udp) = quinn::udp::UdpSocketState::new((&socket).into()) {
        tracing::info!(
            "UDP {}: GSO up to {} datagrams per send, GRO up to {} per receive",
            socket
                .local_addr()
                .map_or("?".to_string(), |a| a.to_string()),
            udp.max_gso_segments(),
            udp.gro_segments()
        );
    }
    let server = match &shared.cfg.transport {
        Transport::Listen(_) => {
            let mut sc = shared.identity.server_config(&RefusalSlot::new())?;
            sc.transport_config(transport.clone());
            Some(sc)
        }
        Transport::Connect { .. } => None,
    };
    let mut ep_config =
        quinn::EndpointConfig::new(Arc::new(stateless_reset_key(&shared.identity.key_pkcs8)));
    // quinn drops packets whose connection id its generator does not recognise, before any
    // reset: the restarted agent must recognise the ids its previous run handed out.
    let cid_key = connection_id_key(&shared.identity.key_pkcs8);
    ep_config.cid_generator(move || {
        Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
    });
    let mut ep = quinn::Endpoint::new(ep_config, server, socket, Arc::new(quinn::TokioRuntime))?;
    if let Transport::Connect { .. } = &shared.cfg.transport {
        let mut cc = shared.identity.client_config(&RefusalSlot::new())?;
        cc.transport_config(transport);
        ep.set_default_client_config(cc);
    }
    Ok(ep)
}

/// The key behind this agent's stateless reset tokens, derived from its private key, so that
/// the same agent restarted after a crash still owns the tokens it handed out: the first packet
/// the peer sends on the dead connection is answered with a reset the peer can verify, and the
/// peer reconnects at once instead of after the idle timeout (RFC 9000 §10.3; quinn's default
/// key is random per process, so a restarted agent's resets would be ignored). HKDF makes the
/// derivation one-way: nothing about the private key can be learnt from a token.
pub(super) fn stateless_reset_key(key_pkcs8: &[u8]) -> ring::hmac::Key {
    let prk = agent_key_prk(key_pkcs8);
    let okm = prk
        .expand(&[b"quic-reset"], ring::hmac::HMAC_SHA256)
        .expect("HMAC-SHA256 key length is a valid HKDF output length");
    ring::hmac::Key::from(okm)
}

/// The key that marks this agent's connection ids as its own (quinn's hashed generator), also
/// derived from the agent's key so that it survives a restart; see [`stateless_reset_key`].
pub(super) fn connection_id_key(key_pkcs8: &[u8]) -> u64 {
    struct Len8;
    impl ring::hkdf::KeyType for Len8 {
        fn len(&self) -> usize {
            8
        }
    }
    let mut out = [0u8; 8];
    agent_key_prk(key_pkcs8)
        .expand(&[b"quic-cid"], Len8)
        .and_then(|okm| okm.fill(&mut out))
        .expect("8 bytes is a valid HKDF output length");
    u64::from_le_bytes(out)
}

pub(super) fn agent_key_prk(key_pkcs8: &[u8]) -> ring::hkdf::Prk {
    ring::hkdf::Salt::new(ring::hkdf::HKDF_SHA256, b"pgferry agent-key derivations v1")
        .extract(key_pkcs8)
}
