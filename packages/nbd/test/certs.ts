import { execFileSync } from 'node:child_process';
import { writeFileSync } from 'node:fs';

/** A CA, a server certificate for 127.0.0.1/localhost and a client certificate (openssl). */
export function makeCerts(dir: string): void {
  execFileSync('mkdir', ['-p', dir]);
  const ssl = (...args: string[]) => execFileSync('openssl', args, { cwd: dir, stdio: 'pipe' });
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
        ? 'subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\nkeyUsage=digitalSignature,keyEncipherment\n'
        : 'extendedKeyUsage=clientAuth\nkeyUsage=digitalSignature,keyEncipherment\n';
    writeFileSync(`${dir}/${side}.ext`, ext);
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
