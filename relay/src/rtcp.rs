//! The few RTCP packets a send-only audio relay writes and reads (RFC 3550, RFC 4585).
//!
//! The fan-out core writes each listener's sender reports itself and reads what listeners
//! report back (receiver reports, NACKs, BYE) after SRTCP decryption. Pure functions over
//! byte slices: no state, no I/O. Parsing never panics; whatever does not parse is skipped.

/// RTCP packet types used here.
const PT_SR: u8 = 200;
const PT_RR: u8 = 201;
const PT_SDES: u8 = 202;
const PT_BYE: u8 = 203;
const PT_RTPFB: u8 = 205;
/// RTPFB format 1: generic NACK.
const FMT_NACK: u8 = 1;

/// What a sender report says about the stream so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SenderInfo {
    /// The stream's SSRC.
    pub ssrc: u32,
    /// Wall-clock time of this report, 64-bit NTP format.
    pub ntp: u64,
    /// The RTP timestamp that corresponds to `ntp`.
    pub rtp_time: u32,
    /// RTP packets sent since the stream started.
    pub packets: u32,
    /// Payload octets sent since the stream started.
    pub octets: u32,
}

/// Appends a compound packet of a sender report (no report blocks: the relay receives
/// nothing) and an SDES with the CNAME, as RFC 3550 §6.1 requires of every compound packet.
pub fn write_sender_report(info: &SenderInfo, cname: &str, out: &mut Vec<u8>) {
    // SR: header, SSRC and 20 bytes of sender info; length in 32-bit words minus one.
    out.extend_from_slice(&[0x80, PT_SR, 0, 6]);
    out.extend_from_slice(&info.ssrc.to_be_bytes());
    out.extend_from_slice(&info.ntp.to_be_bytes());
    out.extend_from_slice(&info.rtp_time.to_be_bytes());
    out.extend_from_slice(&info.packets.to_be_bytes());
    out.extend_from_slice(&info.octets.to_be_bytes());

    // SDES, one chunk: SSRC, CNAME item, END, padded to a 32-bit boundary.
    let cname = &cname.as_bytes()[..cname.len().min(255)];
    let chunk = 4 + 2 + cname.len() + 1;
    let padded = chunk.div_ceil(4) * 4;
    let words = (4 + padded) / 4 - 1;
    out.extend_from_slice(&[0x81, PT_SDES]);
    out.extend_from_slice(&(words as u16).to_be_bytes());
    out.extend_from_slice(&info.ssrc.to_be_bytes());
    out.extend_from_slice(&[1, cname.len() as u8]);
    out.extend_from_slice(cname);
    out.resize(out.len() + padded - chunk + 1, 0);
}

/// One report block about our stream, from a listener's SR or RR (RFC 3550 §6.4.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReportBlock {
    /// Fraction of packets lost since the previous report, in 1/256 units.
    pub fraction_lost: u8,
    /// Packets lost since the stream began (may be negative with duplicates).
    pub cumulative_lost: i32,
    /// Highest sequence number received, extended with its cycle count.
    pub highest_seq: u32,
    /// Interarrival jitter in RTP timestamp units.
    pub jitter: u32,
    /// Middle 32 bits of the NTP time of the last SR received, 0 if none.
    pub last_sr: u32,
    /// Delay since that SR was received, in 1/65536 s.
    pub delay_since_last_sr: u32,
}

/// What a listener's compound RTCP packet says that the relay acts on.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Feedback {
    /// Report blocks about the stream asked for.
    pub reports: Vec<ReportBlock>,
    /// Sequence numbers the listener asks to be sent again (generic NACK).
    pub nacks: Vec<u16>,
    /// NACK packets seen (each may name up to 17 sequence numbers per item).
    pub nack_packets: u32,
    /// The listener said goodbye.
    pub bye: bool,
}

/// Reads a plain (already decrypted) compound RTCP packet for what concerns the stream `ssrc`.
/// Packets about other streams, of other types, or malformed are skipped; parsing stops at
/// the first packet whose length runs past the end.
pub fn read_feedback(mut data: &[u8], ssrc: u32) -> Feedback {
    let mut fb = Feedback::default();
    while data.len() >= 4 {
        let first = data[0];
        if first >> 6 != 2 {
            break;
        }
        let count = first & 0x1f;
        let pt = data[1];
        let len = (usize::from(u16::from_be_bytes([data[2], data[3]])) + 1) * 4;
        let Some(packet) = data.get(..len) else {
            break;
        };
        data = &data[len..];
        match pt {
            PT_SR | PT_RR => {
                // After the header and sender SSRC: 20 bytes of sender info in an SR.
                let skip = if pt == PT_SR { 28 } else { 8 };
                let blocks = packet.get(skip..).unwrap_or(&[]);
                for b in blocks.chunks_exact(24).take(usize::from(count)) {
                    if be32(&b[0..4]) != ssrc {
                        continue;
                    }
                    // 24-bit two's complement.
                    let cumulative = (be32(&b[4..8]) << 8) as i32 >> 8;
                    fb.reports.push(ReportBlock {
                        fraction_lost: b[4],
                        cumulative_lost: cumulative,
                        highest_seq: be32(&b[8..12]),
                        jitter: be32(&b[12..16]),
                        last_sr: be32(&b[16..20]),
                        delay_since_last_sr: be32(&b[20..24]),
                    });
                }
            }
            PT_RTPFB if count == FMT_NACK => {
                // Header, sender SSRC, media SSRC, then (PID, BLP) items.
                if packet.len() < 12 || be32(&packet[8..12]) != ssrc {
                    continue;
                }
                fb.nack_packets += 1;
                for item in packet[12..].chunks_exact(4) {
                    let pid = u16::from_be_bytes([item[0], item[1]]);
                    let blp = u16::from_be_bytes([item[2], item[3]]);
                    fb.nacks.push(pid);
                    for bit in 0..16u16 {
                        if blp & (1 << bit) != 0 {
                            fb.nacks.push(pid.wrapping_add(bit + 1));
                        }
                    }
                }
            }
            PT_BYE => fb.bye = true,
            _ => {}
        }
    }
    fb
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

/// The middle 32 bits of an NTP timestamp: what a receiver echoes as "last SR".
pub fn ntp_middle(ntp: u64) -> u32 {
    (ntp >> 16) as u32
}

/// Microseconds since the Unix epoch as a 64-bit NTP timestamp (seconds since 1900 in the
/// high half, the fraction in the low half).
pub fn ntp_from_unix_micros(us: u64) -> u64 {
    const EPOCH_DELTA: u64 = 2_208_988_800;
    let secs = us / 1_000_000 + EPOCH_DELTA;
    // Rounded: a receiver converting back lands on the same microsecond.
    let frac = (((us % 1_000_000) << 32) + 500_000) / 1_000_000;
    (secs << 32) | frac
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info() -> SenderInfo {
        SenderInfo {
            ssrc: 0x1234_5678,
            ntp: 0xdead_beef_0102_0304,
            rtp_time: 48_000,
            packets: 50,
            octets: 5_000,
        }
    }

    #[test]
    fn a_sender_report_is_a_well_formed_compound_packet() {
        for cname in ["", "a", "ab", "abc", "tern-relay"] {
            let mut out = vec![0xff]; // appends only
            write_sender_report(&info(), cname, &mut out);
            let p = &out[1..];
            assert_eq!(p.len() % 4, 0, "{cname:?}");
            // SR: 28 bytes, its length field says so.
            assert_eq!(&p[..4], &[0x80, 200, 0, 6]);
            assert_eq!(be32(&p[4..8]), 0x1234_5678);
            assert_eq!(&p[8..16], &0xdead_beef_0102_0304u64.to_be_bytes());
            assert_eq!(be32(&p[16..20]), 48_000);
            assert_eq!(be32(&p[20..24]), 50);
            assert_eq!(be32(&p[24..28]), 5_000);
            // SDES fills the rest exactly.
            let sdes = &p[28..];
            assert_eq!(sdes[1], 202);
            let words = u16::from_be_bytes([sdes[2], sdes[3]]) as usize;
            assert_eq!((words + 1) * 4, sdes.len(), "{cname:?}");
            assert_eq!(sdes[8], 1);
            assert_eq!(usize::from(sdes[9]), cname.len());
            assert_eq!(&sdes[10..10 + cname.len()], cname.as_bytes());
            // At least one zero (END) after the item, the rest padding.
            assert!(sdes[10 + cname.len()..].iter().all(|b| *b == 0));
            // Our own reader walks it without finding feedback.
            assert_eq!(read_feedback(p, 0x1234_5678), Feedback::default());
        }
    }

    fn rr(blocks: &[(u32, u8, i32, u32)]) -> Vec<u8> {
        let mut p = vec![0x80 | blocks.len() as u8, 201, 0, 0];
        p.extend_from_slice(&7u32.to_be_bytes());
        for &(s, frac, cum, jitter) in blocks {
            p.extend_from_slice(&s.to_be_bytes());
            p.push(frac);
            p.extend_from_slice(&cum.to_be_bytes()[1..]);
            p.extend_from_slice(&70_000u32.to_be_bytes());
            p.extend_from_slice(&jitter.to_be_bytes());
            p.extend_from_slice(&0xbeef_0102u32.to_be_bytes());
            p.extend_from_slice(&65_536u32.to_be_bytes());
        }
        let words = (p.len() / 4 - 1) as u16;
        p[2..4].copy_from_slice(&words.to_be_bytes());
        p
    }

    fn nack(media: u32, items: &[(u16, u16)]) -> Vec<u8> {
        let mut p = vec![0x81, 205, 0, 0];
        p.extend_from_slice(&7u32.to_be_bytes());
        p.extend_from_slice(&media.to_be_bytes());
        for (pid, blp) in items {
            p.extend_from_slice(&pid.to_be_bytes());
            p.extend_from_slice(&blp.to_be_bytes());
        }
        let words = (p.len() / 4 - 1) as u16;
        p[2..4].copy_from_slice(&words.to_be_bytes());
        p
    }

    #[test]
    fn receiver_reports_about_our_stream_are_read() {
        let ours = 0x1234_5678;
        let mut compound = rr(&[(99, 1, 1, 1), (ours, 64, -3, 480)]);
        compound.extend(nack(ours, &[(65_535, 0b101), (10, 0)]));
        compound.extend(nack(99, &[(1, 0)]));
        compound.extend_from_slice(&[0x81, 203, 0, 1, 0, 0, 0, 7]);
        let fb = read_feedback(&compound, ours);
        assert_eq!(
            fb.reports,
            vec![ReportBlock {
                fraction_lost: 64,
                cumulative_lost: -3,
                highest_seq: 70_000,
                jitter: 480,
                last_sr: 0xbeef_0102,
                delay_since_last_sr: 65_536,
            }]
        );
        // 65535 plus bits 0 and 2 of its mask: 0 and 2 (wrapping).
        assert_eq!(fb.nacks, vec![65_535, 0, 2, 10]);
        assert_eq!(
            fb.nack_packets, 1,
            "the NACK about another stream is not ours"
        );
        assert!(fb.bye);
    }

    #[test]
    fn malformed_feedback_never_panics_and_yields_what_parsed() {
        let ours = 5;
        let good = rr(&[(ours, 10, 2, 3)]);
        // Every truncation, and bytes of noise.
        for n in 0..good.len() {
            let fb = read_feedback(&good[..n], ours);
            assert!(fb.reports.is_empty(), "a truncated RR yields nothing ({n})");
        }
        let mut x: u32 = 0x9e37_79b9;
        for len in 0..300 {
            let noise: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    x as u8
                })
                .collect();
            let _ = read_feedback(&noise, ours);
            // Noise behind a valid RR does not hide the RR.
            let mut both = good.clone();
            both.extend(&noise);
            assert_eq!(read_feedback(&both, ours).reports.len(), 1);
        }
        // A count larger than the blocks present reads only whole blocks.
        let mut lying = good.clone();
        lying[0] = 0x80 | 5;
        assert_eq!(read_feedback(&lying, ours).reports.len(), 1);
    }

    #[test]
    fn ntp_conversion() {
        // 1970-01-01 is NTP second 2208988800; half a second is 2^31.
        assert_eq!(
            ntp_from_unix_micros(500_000),
            (2_208_988_800u64 << 32) | 1 << 31
        );
        assert_eq!(ntp_middle(0x0001_0002_0003_0004), 0x0002_0003);
    }
}
