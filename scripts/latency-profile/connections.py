# Connections of one 5-byte exchange each, one after another: "PORT N"; prints the rate.
import socket, sys, time
port=int(sys.argv[1]); n=int(sys.argv[2])
t=time.time()
for i in range(n):
    s=socket.create_connection(("127.0.0.1",port)); s.sendall(b"hello"); s.recv(5); s.close()
print("cps", n/(time.time()-t))
