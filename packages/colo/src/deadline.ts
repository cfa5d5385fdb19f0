/**
 * A promise's settle functions that also clear its deadline timer: whichever comes first (the
 * answer, an error, or the timer) is the only one that counts.
 */
export function withDeadline<T>(
  timer: NodeJS.Timeout,
  resolve: (v: T) => void,
  reject: (e: Error) => void,
): { resolve(v: T): void; reject(e: Error): void } {
  return {
    resolve: (v) => {
      clearTimeout(timer);
      resolve(v);
    },
    reject: (e) => {
      clearTimeout(timer);
      reject(e);
    },
  };
}
