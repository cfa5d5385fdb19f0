import { BlockError } from '@blockrep/block';

/** QMP error classes (qapi/error.json). */
export type QmpErrorClass =
  | 'GenericError'
  | 'CommandNotFound'
  | 'DeviceNotFound'
  | 'DeviceNotActive'
  | 'KVMMissingCap';

/** An error as QMP reports it: a stable class and a human description. */
export class QmpError extends Error {
  constructor(
    readonly errorClass: QmpErrorClass,
    readonly desc: string,
  ) {
    super(desc);
    this.name = 'QmpError';
  }

  /** The `class` member of the wire form. */
  get class(): QmpErrorClass {
    return this.errorClass;
  }

  static generic(desc: string): QmpError {
    return new QmpError('GenericError', desc);
  }

  /** Any thrown value as a QMP error: block errors keep their class, the rest are generic. */
  static from(e: unknown): QmpError {
    if (e instanceof QmpError) return e;
    if (e instanceof BlockError) return new QmpError(e.errorClass, e.message);
    if (e instanceof Error) return QmpError.generic(e.message);
    return QmpError.generic(String(e));
  }

  toJSON(): { class: QmpErrorClass; desc: string } {
    return { class: this.errorClass, desc: this.desc };
  }
}
