import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import type * as tls from 'node:tls';
import { BlockError } from '@blockrep/block';

/**
 * x509 TLS credentials, as QEMU's `tls-creds-x509` object: a directory holding ca-cert.pem and
 * either server-cert.pem/server-key.pem (endpoint server) or client-cert.pem/client-key.pem
 * (endpoint client; optional unless the server verifies peers).
 */
export interface TlsCredsOptions {
  /** QEMU's object id (what `tls-creds=<id>` names). */
  id?: string;
  endpoint: 'server' | 'client';
  /** Directory with the PEM files. */
  dir: string;
  /** Server: require and verify a client certificate (QEMU's default: on). */
  verifyPeer?: boolean;
}

export class NbdTlsCreds {
  readonly id: string | undefined;
  readonly endpoint: 'server' | 'client';
  readonly verifyPeer: boolean;
  readonly ca: Buffer;
  readonly cert: Buffer | undefined;
  readonly key: Buffer | undefined;

  constructor(opts: TlsCredsOptions) {
    this.id = opts.id;
    this.endpoint = opts.endpoint;
    this.verifyPeer = opts.verifyPeer ?? true;
    const read = (name: string, required: boolean): Buffer | undefined => {
      try {
        return readFileSync(join(opts.dir, name));
      } catch (e) {
        if (!required) return undefined;
        throw new BlockError(`Unable to access credentials ${join(opts.dir, name)}: ${(e as Error).message}`);
      }
    };
    this.ca = read('ca-cert.pem', true)!;
    const side = opts.endpoint;
    this.cert = read(`${side}-cert.pem`, side === 'server');
    this.key = read(`${side}-key.pem`, side === 'server');
  }

  /** Options for tls.TLSSocket on the server side of a STARTTLS upgrade. */
  serverOptions(): tls.TLSSocketOptions {
    if (this.endpoint !== 'server') throw new BlockError('Expected TLS credentials for a server endpoint');
    return {
      isServer: true,
      ca: this.ca,
      cert: this.cert,
      key: this.key,
      requestCert: this.verifyPeer,
      rejectUnauthorized: this.verifyPeer,
      minVersion: 'TLSv1.2',
    };
  }

  /** Options for tls.connect on the client side; the server's certificate must name `hostname`. */
  clientOptions(hostname: string): tls.ConnectionOptions {
    if (this.endpoint !== 'client') throw new BlockError('Expected TLS credentials for a client endpoint');
    return {
      ca: this.ca,
      cert: this.cert,
      key: this.key,
      host: hostname,
      servername: /^[\d.:]+$/.test(hostname) ? undefined : hostname,
      minVersion: 'TLSv1.2',
    };
  }
}

const registry = new Map<string, NbdTlsCreds>();

/** Makes credentials findable by id for the nbd driver's `tls-creds` option (QEMU's -object). */
export function registerTlsCreds(creds: NbdTlsCreds): void {
  if (!creds.id) throw new BlockError('TLS credentials need an id to be registered');
  registry.set(creds.id, creds);
}

export function unregisterTlsCreds(id: string): void {
  registry.delete(id);
}

/** Tells whether some other object (a QOM tree's) has the id: its lookup says "not TLS credentials". */
let otherObject: ((id: string) => boolean) | null = null;

export function setTlsObjectLookup(fn: ((id: string) => boolean) | null): void {
  otherObject = fn;
}

export function lookupTlsCreds(id: string): NbdTlsCreds {
  const c = registry.get(id);
  if (!c) {
    if (otherObject?.(id)) throw new BlockError(`Object with id '${id}' is not TLS credentials`);
    throw new BlockError(`No TLS credentials with id '${id}'`);
  }
  return c;
}
