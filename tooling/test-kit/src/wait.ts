import type { EventEmitter } from 'node:events';

export interface WaitForOptions {
  /**
   * Give up after this long (default 30 s). A deadline, not a pace: it is sized for a loaded
   * 2-core CI machine, and a passing test never waits it out.
   */
  timeoutMs?: number;
  /** Check again this often, when no `on` event drives the checks (default 10 ms). */
  intervalMs?: number;
  /** Check again on every emission of these events (instead of polling). */
  on?: [emitter: EventEmitter, ...events: string[]];
  /** What is awaited, for the timeout error ("job j0 paused"); a function is called then. */
  what?: string | (() => string);
}

/**
 * Waits until `check` returns a truthy value (it may be async) and resolves with that value;
 * rejects with `check`'s error, or after `timeoutMs` with an error naming `what`. For tests that
 * wait for a state, instead of sleeping a fixed time or polling a fixed number of times.
 */
export function waitFor<T>(check: () => T | Promise<T>, opts: WaitForOptions = {}): Promise<T> {
  const { timeoutMs = 30_000, intervalMs = 10, on, what = 'the condition' } = opts;
  return new Promise<T>((resolve, reject) => {
    let done = false;
    let checking = false;
    let recheck = false;
    let poll: NodeJS.Timeout | undefined;
    const [emitter, ...events] = on ?? [];
    const finish = (err: unknown, value?: T) => {
      if (done) return;
      done = true;
      clearTimeout(deadline);
      clearTimeout(poll);
      for (const e of events) emitter!.off(e, attempt);
      if (err) reject(err);
      else resolve(value as T);
    };
    // One check at a time; an event arriving during an async check asks for another after it.
    async function attempt(): Promise<void> {
      if (done) return;
      if (checking) {
        recheck = true;
        return;
      }
      checking = true;
      try {
        do {
          recheck = false;
          const v = await check();
          if (v) return finish(null, v);
        } while (recheck && !done);
      } catch (e) {
        return finish(e);
      } finally {
        checking = false;
      }
      if (!emitter && !done) poll = setTimeout(attempt, intervalMs);
    }
    const deadline = setTimeout(
      () =>
        finish(
          new Error(
            `waitFor: ${typeof what === 'function' ? what() : what} not reached within ${timeoutMs} ms`,
          ),
        ),
      timeoutMs,
    );
    for (const e of events) emitter!.on(e, attempt);
    void attempt();
  });
}
