export interface Summary {
  passed: number;
  failed: number;
  skipped: number;
  missing: string[];
}

export declare function summarize(packages: { name: string; report: string }[]): Summary;
export declare function summaryLine(s: Summary): string;
