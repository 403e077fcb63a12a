/**
 * The shapes the server extension sends, with the wire's snake_case keys.
 * Only connection.ts turns JSON into these.
 */

export type EngineState = 'starting' | 'idle' | 'busy' | 'dead';

export interface IGpu {
  index: number;
  uuid: string;
  name: string;
  utilization_percent: number | null;
  memory_used_bytes: number | null;
  memory_total_bytes: number | null;
  temperature_c: number | null;
  power_w: number | null;
  process_memory_bytes: number | null;
}

export interface IEngine {
  engine_id: number;
  host: string;
  pid: number;
  state: EngineState;
  task_id: string | null;
  queued: number;
  cpu_percent: number | null;
  rss_bytes: number | null;
  gpus: IGpu[];
  exit_code: number | null;
}

export interface IActor {
  actor_id: string;
  class_name: string;
  name: string | null;
  engine_id: number | null;
  pending: number;
  calls_done: number;
  state: unknown;
}

export interface ITaskCounts {
  pending: number;
  queued: number;
  done: number;
  failed: number;
}

export interface IClusterState {
  cluster_id: string;
  engines: IEngine[];
  tasks: ITaskCounts;
  actors: IActor[];
  /** When (epoch seconds) the cluster stops itself if it stays idle; null: no idle timeout, or work pending. */
  idle_stop_at: number | null;
  seq: number;
}

export interface ICluster {
  cluster_id: string;
  host: string;
  ip: string;
  controller_pid: number;
  created: number;
  state: IClusterState | null;
}

/** What the panel asks of POST /jupyter-dist/clusters. */
export interface IStartRequest {
  /** Engines to start; null: one per GPU share (only with gpus). */
  n: number | null;
  /** "all", a count such as "2", or indices such as "0,3"; absent: no GPUs. */
  gpus?: string;
  gpus_per_engine?: number;
}

export type ClusterEvent =
  | { type: 'clusters'; clusters: ICluster[] }
  | { type: 'cluster'; cluster: ICluster }
  | { type: 'cluster_removed'; cluster_id: string };
