import { execFileSync } from 'node:child_process';
import { copyFileSync, mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';

export interface CertOptions {
  /** Addresses the server certificate names (default 127.0.0.1; localhost is always named). */
  ips?: string[];
  /** Sign with the CA of this directory (its ca-cert.pem and ca-key.pem) instead of a new one. */
  caDir?: string;
}

/**
 * A tls-creds-x509 directory (openssl): ca-cert.pem, a server certificate for the given addresses
 * and localhost, and a client certificate, both signed by the CA.
 */
export function makeCerts(dir: string, o: CertOptions = {}): void {
  mkdirSync(dir, { recursive: true });
  const ssl = (...args: string[]) => execFileSync('openssl', args, { cwd: dir, stdio: 'pipe' });
  if (o.caDir) {
    for (const f of ['ca-cert.pem', 'ca-key.pem']) copyFileSync(join(o.caDir, f), join(dir, f));
  } else {
    ssl(
      'req',
      '-x509',
      '-newkey',
      'rsa:2048',
      '-nodes',
      '-days',
      '2',
      '-subj',
      '/CN=blockrep test CA',
      '-keyout',
      'ca-key.pem',
      '-out',
      'ca-cert.pem',
      '-addext',
      'basicConstraints=critical,CA:TRUE',
      '-addext',
      'keyUsage=critical,keyCertSign,cRLSign',
    );
  }
  const sans = [...(o.ips ?? ['127.0.0.1']).map((a) => `IP:${a}`), 'DNS:localhost'].join(',');
  for (const side of ['server', 'client']) {
    ssl(
      'req',
      '-newkey',
      'rsa:2048',
      '-nodes',
      '-subj',
      `/CN=${side === 'server' ? 'localhost' : 'blockrep-client'}`,
      '-keyout',
      `${side}-key.pem`,
      '-out',
      `${side}.csr`,
    );
    const ext =
      side === 'server'
        ? `subjectAltName=${sans}\nextendedKeyUsage=serverAuth\nkeyUsage=digitalSignature,keyEncipherment\n`
        : 'extendedKeyUsage=clientAuth\nkeyUsage=digitalSignature,keyEncipherment\n';
    writeFileSync(join(dir, `${side}.ext`), ext);
    ssl(
      'x509',
      '-req',
      '-in',
      `${side}.csr`,
      '-CA',
      'ca-cert.pem',
      '-CAkey',
      'ca-key.pem',
      '-CAcreateserial',
      '-days',
      '2',
      '-out',
      `${side}-cert.pem`,
      '-extfile',
      `${side}.ext`,
    );
  }
}
