"""Probes the integration tests send from guests (shared support code, not a test module)."""

# Sent from the guest through its gateway to the host's 127.0.0.1, bypassing the
# guest's own loopback route: an Ethernet frame made by hand (IPv4, UDP without
# checksum) on a raw socket.
LOOPBACK_PROBE = """
import socket, struct, sys
src, dst, port, gw_mac = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
mine = open('/sys/class/net/eth0/address').read().strip()
payload = b'guest-was-here'
udp = struct.pack('!HHHH', 40000, port, 8 + len(payload), 0) + payload
def csum(data):
    total = sum(struct.unpack('!10H', data))
    total = (total >> 16) + (total & 0xFFFF)
    return ~(total + (total >> 16)) & 0xFFFF
ip = struct.pack('!BBHHHBBH4s4s', 0x45, 0, 20 + len(udp), 1, 0x4000, 64, 17, 0,
                 socket.inet_aton(src), socket.inet_aton(dst))
ip = ip[:10] + struct.pack('!H', csum(ip)) + ip[12:]
eth = bytes.fromhex(gw_mac.replace(':', '')) + bytes.fromhex(mine.replace(':', '')) + b'\\x08\\x00'
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind(('eth0', 0))
for _ in range(3):
    s.send(eth + ip + udp)
"""
