import { connect, createServer, type Socket } from 'node:net';

/** A TCP port on 127.0.0.1 that was free a moment ago (the OS picked it). */
export function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const srv = createServer();
    srv.unref();
    srv.on('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const addr = srv.address();
      const port = typeof addr === 'object' && addr ? addr.port : 0;
      srv.close(() => resolve(port));
    });
  });
}

/** Whether the socket, just connecting, gets accepted (it is closed either way). */
function accepted(s: Socket): Promise<boolean> {
  return new Promise((resolve) => {
    s.once('connect', () => {
      s.destroy();
      resolve(true);
    });
    s.once('error', () => resolve(false));
  });
}

/** Whether something accepts TCP connections on 127.0.0.1:port now. */
export function tcpAccepts(port: number): Promise<boolean> {
  return accepted(connect(port, '127.0.0.1'));
}

/**
 * Whether something accepts connections on the Unix socket at path now (the file alone is not
 * enough: a server binds it before it listens, and a connection in between is refused).
 */
export function unixAccepts(path: string): Promise<boolean> {
  return accepted(connect(path));
}
