/* What the crash test may find in an image after a kill, from the writer's log. */

/**
 * Narrows, for each slot, the generations its sectors may hold after this crash: any generation
 * it could hold before, or started since, but nothing older than one acknowledged before the
 * last completed flush began. Generations grow across runs, so "older" is a comparison.
 */
export function narrowPossible(
  lines: string[],
  possible: Map<number, Set<number>>,
  zeroGens: Set<number>,
): void {
  // Flushes overlap (every worker flushes): what is durable is what was acknowledged before the
  // latest beginning among the flushes that completed, each "F n" paired with its own "B n".
  const begins = new Map<string, number>();
  let flushBegin = -1;
  for (let i = 0; i < lines.length; i++) {
    const [op, id] = lines[i]!.split(' ');
    if (op === 'B') begins.set(id!, i);
    if (op === 'F') flushBegin = Math.max(flushBegin, begins.get(id!)!);
  }
  const durable = new Map<number, number>();
  for (let i = 0; i < lines.length; i++) {
    const [op, a, b, z] = lines[i]!.split(' ');
    if (op === 'A' && i < flushBegin) durable.set(Number(a), Number(b));
    if (op === 'S') possible.get(Number(a))!.add(Number(b));
    if (op === 'S' && z === 'Z') zeroGens.add(Number(b));
  }
  for (const [slot, gen] of durable) {
    const set = possible.get(slot)!;
    for (const g of [...set]) if (g < gen) set.delete(g);
  }
}
