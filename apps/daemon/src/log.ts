const LEVELS = { debug: 10, info: 20, warn: 30, error: 40 } as const;
export type LogLevel = keyof typeof LEVELS;

/** Structured logs: one JSON object a line on stderr. */
export class Logger {
  /** Set once stderr has no reader any more (a daemonized process). */
  muted = false;

  constructor(private readonly level: LogLevel) {}

  log(level: LogLevel, msg: string, fields: Record<string, unknown> = {}): void {
    if (this.muted || LEVELS[level] < LEVELS[this.level]) return;
    process.stderr.write(`${JSON.stringify({ ts: new Date().toISOString(), level, msg, ...fields })}\n`);
  }

  debug(msg: string, f?: Record<string, unknown>) {
    this.log('debug', msg, f);
  }
  info(msg: string, f?: Record<string, unknown>) {
    this.log('info', msg, f);
  }
  warn(msg: string, f?: Record<string, unknown>) {
    this.log('warn', msg, f);
  }
  error(msg: string, f?: Record<string, unknown>) {
    this.log('error', msg, f);
  }
}
