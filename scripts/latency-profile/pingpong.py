# The ping-pong of scripts/latency-profile/run: "serve PORT" is the echo upstream (a thread per
# connection); "client PORT N" sends one byte and waits for it back, N times, and prints the mean
# round trip.
import socket, sys, time, threading
if sys.argv[1] == "serve":
    up = socket.socket(); up.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    up.bind(("127.0.0.1", int(sys.argv[2]))); up.listen(16)
    while True:
        c, _ = up.accept()
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        def echo(c=c):
            while True:
                d = c.recv(65536)
                if not d: break
                c.sendall(d)
        threading.Thread(target=echo, daemon=True).start()
port = int(sys.argv[2]); n = int(sys.argv[3])
s = socket.create_connection(("127.0.0.1", port)); s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
t = time.time()
for i in range(n):
    s.sendall(b"x"); s.recv(1)
print("rt us", (time.time()-t)/n*1e6)
